from smoe.cli.main import main

raise SystemExit(main())
