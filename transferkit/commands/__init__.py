"""One module per command, named as the user types it (`select`, `upgrade`, `bases --rank`,
`augment-preview`); each a core function `verb(config, reporter) -> Result` that the CLI
calls and a notebook can too. finetune's is the staged recipe (finetune.py); cv runs it on
each fold."""
