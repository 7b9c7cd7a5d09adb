"""smedjan's stage tools: one module per tool, each thin (flags -> lib -> outputs).

Every tool is a subcommand of the umbrella `smedjan` (`tools/cli.py`) and also a
console script of its own (`smedjan-tokenizer`, ...).
"""
