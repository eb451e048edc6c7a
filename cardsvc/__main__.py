from cardsvc.cli import main

raise SystemExit(main())
