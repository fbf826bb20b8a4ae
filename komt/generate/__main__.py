"""`python -m komt.generate`: see komt/generate/cli.py.

The import is inside the try: it pulls in torch (seconds), and a Ctrl-C then is an exit 130, not a traceback.
"""

try:
    from komt.generate.cli import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

raise SystemExit(main())
