from device.cli import main

main()
