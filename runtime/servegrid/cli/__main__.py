from servegrid.cli.main import main

main()
