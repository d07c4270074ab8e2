from fedge.cli import app

app(prog_name="fedge")
