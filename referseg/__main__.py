from referseg.cli import main

raise SystemExit(main())
