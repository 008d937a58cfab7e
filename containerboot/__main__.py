from containerboot.cli import main

main()
