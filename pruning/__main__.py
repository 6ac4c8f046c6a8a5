from pruning.cli import main

raise SystemExit(main())
