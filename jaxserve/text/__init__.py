"""The text side: detokenization and the output processor, chat templates, tool and reasoning parsers, structured output."""
