from chatglm.cli.app import main

main()
