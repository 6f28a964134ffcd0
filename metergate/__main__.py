from metergate.cli import main

raise SystemExit(main())
