"""`jaxserve check`: every serving program of a model, compiled for a named TPU topology on a machine without
one, with its memory per chip and a roofline estimate. targets.py names the hardware, programs.py builds and
compiles the programs, command.py is the command line, libtpu.py fetches the compiler."""
