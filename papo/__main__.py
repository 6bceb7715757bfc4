from papo.cli import main

raise SystemExit(main())
