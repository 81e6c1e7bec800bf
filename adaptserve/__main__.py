from adaptserve.cli import main

raise SystemExit(main())
