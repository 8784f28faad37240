import sys


def run() -> None:
    """``python -m swinlab sweep ...`` goes to the sweep runner, anything else to the LightningCLI."""
    if sys.argv[1:2] == ["sweep"]:
        from swinlab.sweep import main as sweep

        sys.exit(sweep(sys.argv[2:]))
    from swinlab.cli import main

    main()


if __name__ == "__main__":
    run()
