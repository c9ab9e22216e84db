"Shared by the integration tests: run a console entry point in-process, and a tiny trained checkpoint."
import contextlib, io
import pytest

TINY_MODEL = ['--set', 'channels=8', 'n_blocks=1', 'encoder_channels=8', 'encoder_blocks=1']
QUIET = ['--batch-size', '16', '--eval-every', '0', '--final-n-t', '1', '--samples', '0', '--no-progress']


def run_cli(fn, args):
    "Call a console entry point `fn(argv)`; returns (exit code, captured stderr). argparse's SystemExit becomes its code."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: code = fn(args)
        except SystemExit as e: code = e.code
    return code, err.getvalue()


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
    "A digits-mulan checkpoint of a tiny network after 3 steps."
    from mulan_nb.cli import train_main as main
    out = tmp_path_factory.mktemp('tiny-run')
    code, err = run_cli(main, ['--out', str(out), '--steps', '3', *QUIET, *TINY_MODEL])
    assert code == 0, err
    return out / 'checkpoint.pt'
