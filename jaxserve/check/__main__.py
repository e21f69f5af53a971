import sys

from jaxserve.check.command import main

sys.exit(main())
