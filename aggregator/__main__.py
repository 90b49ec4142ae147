from aggregator import cli

raise SystemExit(cli.main())
