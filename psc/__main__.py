from psc.cli import main

main()
