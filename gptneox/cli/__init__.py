"""The command-line tools: each module's `main(argv)` is a console command of the installed package
(pyproject.toml's [project.scripts]) and runs from a checkout as tools/NAME.py."""
