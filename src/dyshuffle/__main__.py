from dyshuffle.cli import main

raise SystemExit(main())
