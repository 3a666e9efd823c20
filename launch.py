"""The one entry point: `python launch.py` serves the tutor; `--retrain` runs RLHF cycles.

Settings come from dataclass defaults, then an optional --config file (TOML or YAML), then flags.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DESCRIPTION = "A tutoring chat that learns from its users' feedback (RLHF)."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Flags default to None so that only the ones given override the --config file.
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--host", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to serve on (default: 7860)")
    p.add_argument("--db", type=Path, help="SQLite file, created and migrated on start (default: conversations.db)")
    p.add_argument("--models-dir", type=Path, help="where versioned policies live (default: models)")
    p.add_argument("--model", type=Path,
                   help="base policy: a local Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--config", type=Path, help="settings file, TOML or YAML, with [serve] tables (default: none)")
    p.add_argument("--retrain", action="store_true", help="run RLHF cycle(s) from the feedback in --db, then exit")
    p.add_argument("--cycles", type=int, default=1, help="with --retrain: cycles to run back to back (default: 1)")
    p.add_argument("--watch", action="store_true",
                   help="with --retrain: keep running, and start a cycle whenever enough new feedback has "
                        "arrived ([retrain.watch] in --config)")
    p.add_argument("--export", type=Path, metavar="DIR", help="write the feedback as TRL-format JSONL into DIR, then exit")
    p.add_argument("--rollback", metavar="VERSION", help="make an older policy version current again, then exit")
    accounts = p.add_argument_group("accounts (then exit; the password is read from a prompt, or from stdin "
                                    "when it is not a terminal)")
    accounts.add_argument("--add-user", metavar="NAME", help="add an account")
    accounts.add_argument("--role", choices=("learner", "teacher", "admin"), default="learner",
                          help="with --add-user (default: learner)")
    accounts.add_argument("--teacher", metavar="NAME", help="with --add-user: the learner's teacher")
    accounts.add_argument("--add-users", type=Path, metavar="CSV",
                          help="add a class at once: CSV with columns name,role,teacher,password "
                               "(empty passwords are generated and printed)")
    accounts.add_argument("--set-password", metavar="NAME", help="change an account's password")
    accounts.add_argument("--disable-user", metavar="NAME", help="stop an account from logging in")
    accounts.add_argument("--enable-user", metavar="NAME", help="let a disabled account log in again")
    accounts.add_argument("--list-users", action="store_true", help="list the accounts")
    p.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING)")
    return p.parse_args(argv)


def serve_config(args: argparse.Namespace):
    from app.config import ServeConfig
    from core.settings import merge, read_config_file

    config = ServeConfig()
    if args.config:
        file = read_config_file(args.config)
        config = merge(config, file.get("serve", {}), "serve")
    flags = {"host": args.host, "port": args.port, "db": args.db, "models_dir": args.models_dir, "model": args.model}
    return merge(config, {k: v for k, v in flags.items() if v is not None}, "flags")


def read_password(prompt: str = "Password: ") -> str:
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


def accounts_db(args: argparse.Namespace) -> Path:
    """The DB the account commands change: [serve] db of --config (the whole file checked, as the server
    checks it), else --db, else the server's default. Without a settings file the serving stack (torch,
    the model) is not loaded, so that adding a class takes a moment instead of the app's start-up."""
    if args.config:
        return serve_config(args).db
    from app.store import DEFAULT_DB

    return args.db or DEFAULT_DB


def manage_accounts(args: argparse.Namespace) -> int:
    from app.accounts import AccountError, Accounts
    from app.store import Store

    try:
        with Store(accounts_db(args)) as store:
            accounts = Accounts(store)
            if args.add_user:
                account = accounts.add(args.add_user, args.role, read_password(), args.teacher)
                print(f"added {account.role} {account.name}" + (f" (teacher {account.teacher})" if account.teacher else ""))
            elif args.add_users:
                for account, password in accounts.add_from_csv(args.add_users.read_text(encoding="utf-8")):
                    print(f"{account.name},{account.role},{account.teacher or ''},{password}")
            elif args.set_password:
                accounts.set_password(args.set_password, read_password("New password: "))
                print(f"password of {args.set_password} changed")
            elif args.disable_user or args.enable_user:
                name = args.disable_user or args.enable_user
                accounts.set_disabled(name, bool(args.disable_user))
                print(f"{name} {'disabled' if args.disable_user else 'enabled'}")
            else:
                for row in store.accounts():
                    print(f"{row['name']}\t{row['role']}\t{row['teacher'] or '-'}\t"
                          f"{'disabled' if row['disabled'] else 'enabled'}")
    except (AccountError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.add_user or args.add_users or args.set_password or args.disable_user or args.enable_user \
            or args.list_users:
        return manage_accounts(args)
    if args.retrain or args.export or args.rollback:
        from rlhf.cli import run_offline

        return run_offline(args)
    from app.versions import ModelError

    try:
        config = serve_config(args)
        from app.server import create_app

        tutor = create_app(config, settings_file=args.config)
    except (ModelError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Tutor serving policy {tutor.engine.version} on http://{config.host}:{config.port}  (Ctrl-C stops)")
    try:
        tutor.launch(block=True)
    except KeyboardInterrupt:
        pass
    finally:
        tutor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
