from bench import run

# Guarded: spawned worker processes (memory, daemon clients) import this module as __mp_main__.
if __name__ == "__main__":
    raise SystemExit(run.main())
