"""The commands' argument parser: examples print as written, defaults are shown, and every `--snake_case`
option is also accepted as `--kebab-case` (one spelling in --help, both on the command line). No torch
import here: `--help` answers at once."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its example lines stay lines) and each option's default after its help,
    unless the default is empty (None, False, []) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if empty or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        import sys
        args = sys.argv[1:] if args is None else list(args)
        known = {s for action in self._actions for s in action.option_strings}
        return super().parse_known_args([self._spelled(a, known) for a in args], namespace)

    @staticmethod
    def _spelled(arg, known):
        """`--dry_run` -> `--dry_run` (and `--num-images=4` -> `--num_images=4`) when that is an option."""
        if not arg.startswith("--"):
            return arg
        name, eq, value = arg.partition("=")
        for candidate in (name.replace("-", "_").replace("__", "--", 1), name.replace("_", "-")):
            if candidate in known and name not in known:
                return candidate + eq + value
        return arg
