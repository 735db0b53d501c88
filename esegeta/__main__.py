from esegeta.cli.commands import console

console()
