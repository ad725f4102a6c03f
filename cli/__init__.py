"""The `sparse-interp` command line (cli/main.py): run the pipeline, attribute prompts, query, export and
serve stored graphs. It only parses options and calls the stages' public functions; no math here."""
