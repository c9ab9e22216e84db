"""Nothing lost, nothing silent: run folders that are never clobbered, one process per folder, outputs that
replace nothing they do not own, torn metrics, interrupted writes, signals, exact-or-refused resumes, and the
checks of values where they enter (issue 14). Each test breaks what it guards when the guard is removed."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest, torch
from conftest import run_cli, TINY_MODEL, QUIET
from mulan_nb.cli import train_main, eval_main, sample_main
from mulan_nb.model import load_checkpoint, save_checkpoint, model_from_checkpoint, MuLAN
from mulan_nb.training import Trainer, TrainConfig

ARGS = [*QUIET, *TINY_MODEL]


def train(out, *more): return run_cli(train_main, ['--out', str(out), *ARGS, *more])


def cli(*args): return [sys.executable, '-c', 'import sys; from mulan_nb.cli import train_main; sys.exit(train_main())', *args]


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    assert train(tmp_path, '--steps', '2')[0] == 0
    before = (tmp_path / 'checkpoint.pt').read_bytes(), (tmp_path / 'metrics.jsonl').read_text()
    code, err = train(tmp_path, '--steps', '2', '--seed', '1')
    assert code == 2 and err.count('\n') == 1 and 'holds a run already' in err and '--resume' in err and '--overwrite' in err, err
    assert ((tmp_path / 'checkpoint.pt').read_bytes(), (tmp_path / 'metrics.jsonl').read_text()) == before   # untouched
    code, err = train(tmp_path, '--steps', '2', '--preset', 'digits-vdm')
    assert code == 2 and 'holds a run already' in err                                                      # another preset too
    assert train(tmp_path, '--steps', '2', '--seed', '1', '--overwrite')[0] == 0
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['train']['seed'] == 1
    code, err = train(tmp_path, '--steps', '3', '--resume', '--overwrite')
    assert code == 2 and 'exclude each other' in err


def test_two_processes_on_one_folder_the_second_is_refused(tmp_path):
    first = subprocess.Popen(cli('--out', str(tmp_path), *ARGS, '--steps', '100000'), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'metrics.jsonl').exists() and time.time() < deadline: time.sleep(0.05)
        time.sleep(0.5)
        second = subprocess.run(cli('--out', str(tmp_path), *ARGS, '--steps', '2', '--resume'), capture_output=True, text=True)
        assert second.returncode == 2 and 'in use by another training process' in second.stderr and str(first.pid) in second.stderr, second.stderr
        assert second.stderr.count('\n') == 1
    finally:
        first.send_signal(signal.SIGKILL); first.wait()
    # the lock died with its process: a resume can go on at once
    assert train(tmp_path, '--steps', '1', '--overwrite')[0] == 0


def test_sigterm_ends_with_one_line_and_a_resumable_folder(tmp_path):
    proc = subprocess.Popen(cli('--out', str(tmp_path), *ARGS, '--steps', '100000', '--ckpt-every', '2'),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / 'checkpoint.pt').exists() and time.time() < deadline: time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, (proc.returncode, err)
    assert err.count('\n') == 1 and 'stopped (SIGTERM)' in err and 'continue with --resume' in err, err
    assert not list(tmp_path.glob('*.tmp*'))
    step = load_checkpoint(tmp_path / 'checkpoint.pt')['step']
    code, err = train(tmp_path, '--steps', str(step + 2), '--ckpt-every', '2', '--resume')
    assert code == 0, err


def test_an_interrupted_checkpoint_write_keeps_the_old_one_and_leaves_no_temporary(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / 'c.pt', {'step': 1, 'w': torch.zeros(3)})
    real_save = torch.save
    def killed_mid_write(obj, fh, *a, **k):
        fh.write(b'half a checkpoint'); raise KeyboardInterrupt('SIGTERM')
    monkeypatch.setattr(torch, 'save', killed_mid_write)
    with pytest.raises(KeyboardInterrupt): save_checkpoint(tmp_path / 'c.pt', {'step': 2, 'w': torch.ones(3)})
    monkeypatch.setattr(torch, 'save', real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['c.pt'] and load_checkpoint(tmp_path / 'c.pt')['step'] == 1


def test_stale_temporaries_of_a_killed_writer_are_removed_on_the_next_start(tmp_path):
    assert train(tmp_path, '--steps', '2')[0] == 0
    (tmp_path / 'checkpoint.pt.tmp99999').write_bytes(b'left by a SIGKILL mid-write')
    assert train(tmp_path, '--steps', '3', '--resume')[0] == 0
    assert not list(tmp_path.glob('*.tmp*'))


def test_a_torn_metrics_line_is_named_and_repaired_on_resume(tmp_path):
    assert train(tmp_path, '--steps', '2', '--log-every', '1')[0] == 0
    with open(tmp_path / 'metrics.jsonl', 'a') as fh: fh.write('{"kind": "train", "step": 3, "bp')
    code, err = train(tmp_path, '--steps', '4', '--log-every', '1', '--resume')
    assert code == 0 and 'torn last line' in err and 'metrics.jsonl' in err, err
    rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]   # every line parses again
    assert [r['step'] for r in rows if r['kind'] == 'train'] == [1, 2, 3, 4]
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    (tmp_path / 'metrics.jsonl').write_text('\n'.join([lines[0], 'garbage', *lines[1:]]) + '\n')
    code, err = train(tmp_path, '--steps', '5', '--resume')
    assert code == 2 and 'line 2, is damaged' in err and 'metrics.jsonl' in err, err


def test_a_crash_in_a_mid_run_evaluation_keeps_that_steps_checkpoint(tmp_path, monkeypatch):
    def crash(self, n_t): raise RuntimeError('out of memory in the evaluation')
    monkeypatch.setattr(Trainer, 'evaluate', crash)
    cfg = TrainConfig(model=dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1), steps=8, batch_size=16,
                      ckpt_every=4, eval_every=4, out=str(tmp_path), n_samples=0)
    with pytest.raises(RuntimeError, match='out of memory'): Trainer(cfg, progress=False).fit()
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 4


@pytest.mark.parametrize('change, words', [
    (['--seed', '1'], "seed 0 -> 1"), (['--batch-size', '8'], 'batch_size 16 -> 8'), (['--accum', '2'], 'accum 1 -> 2'),
    (['--set', 'channels=16'], 'model.channels 8 -> 16'), (['--data', 'DATA', '--levels', '17'], "data 'digits' ->"),
])
def test_a_resume_that_would_not_continue_exactly_is_refused_naming_the_field(tmp_path, change, words):
    assert train(tmp_path / 'run', '--steps', '2')[0] == 0
    np.save(tmp_path / 'd.npy', np.random.default_rng(0).integers(0, 17, (100, 8, 8)))
    change = [str(tmp_path / 'd.npy') if a == 'DATA' else a for a in change]
    code, err = train(tmp_path / 'run', *change, '--steps', '4', '--resume')
    assert code == 2 and err.count('\n') == 1 and 'cannot resume' in err and words in err, err


def test_a_resume_on_other_images_of_the_same_name_is_refused_by_fingerprint(tmp_path):
    data = tmp_path / 'd.npy'
    np.save(data, np.random.default_rng(0).integers(0, 17, (100, 8, 8)))
    base = ['--data', str(data), '--levels', '17']
    assert train(tmp_path / 'run', '--steps', '2', *base)[0] == 0
    np.save(data, np.random.default_rng(1).integers(0, 17, (100, 8, 8)))
    code, err = train(tmp_path / 'run', '--steps', '4', '--resume', *base)
    assert code == 2 and 'the training images differ' in err, err


def test_safe_changes_on_resume_are_stated(tmp_path):
    assert train(tmp_path, '--steps', '2')[0] == 0
    code, err = train(tmp_path, '--steps', '4', '--lr', '1e-3', '--resume')
    assert code == 0 and 'resuming with steps 2 -> 4' in err and 'resuming with lr 0.0002 -> 0.001' in err, err


@pytest.mark.parametrize('args, words', [
    (['--set', 'gamma_min=-1e400'], 'gamma_min must be a finite number'), (['--set', 'gamma_max=inf'], 'gamma_max must be a finite number'),
    (['--set', 'fourier=(2,2000)'], 'fourier exponents must be integers in [-8, 24]'), (['--set', 'channels=2.5'], 'channels must be an integer, got 2.5'),
    (['--set', 'attention=yes'], "attention must be True or False, got 'yes'"), (['--set', 'latent_m=True'], 'latent_m must be an integer'),
    (['--steps', '2.5'], "invalid integer >= 1 value: '2.5'"), (['--lr', 'inf'], 'must be a finite number'), (['--levels', '0'], 'K (levels'),
    (['--ema', 'nan'], 'must be a finite number'), (['--device', 'gpu'], "unknown device 'gpu'"), (['--device', 'cuda:7'], 'cuda:7'),
])
def test_values_typed_on_the_command_line_are_checked_where_they_enter(tmp_path, args, words):
    code, err = train(tmp_path, '--steps', '1', *args)
    assert code == 2 and err.count('\n') == 1 and words in err and 'Traceback' not in err, err


def test_mulan_eval_and_mulan_sample_never_overwrite_the_checkpoint_or_a_foreign_file(tiny_checkpoint, tmp_path):
    before = tiny_checkpoint.read_bytes()
    code, err = run_cli(eval_main, [str(tiny_checkpoint), '--out', str(tiny_checkpoint), '--first', '2', '--n-t', '1'])
    assert code == 2 and 'is the checkpoint' in err, err
    notes = tmp_path / 'notes.json'; notes.write_text('{"mine": 1}')
    code, err = run_cli(eval_main, [str(tiny_checkpoint), '--out', str(notes), '--first', '2', '--n-t', '1'])
    assert code == 2 and 'not written by this command' in err and notes.read_text() == '{"mine": 1}', err
    (tmp_path / 'mine.npz').write_bytes(b'not samples')
    code, err = run_cli(sample_main, [str(tiny_checkpoint), '--out', str(tmp_path / 'mine'), '--n', '2', '--steps', '2'])
    assert code == 2 and 'not written by this command' in err and (tmp_path / 'mine.npz').read_bytes() == b'not samples', err
    assert tiny_checkpoint.read_bytes() == before
    res = tmp_path / 'e.json'
    for _ in range(2): assert run_cli(eval_main, [str(tiny_checkpoint), '--out', str(res), '--first', '1', '--n-t', '2'])[0] == 0   # its own result is replaced
    out = json.loads(res.read_text())   # strict JSON: a bare NaN would not parse with this hook
    json.loads(res.read_text(), parse_constant=lambda c: pytest.fail(f'bare {c} in the JSON'))
    assert out['se'] is None and 'fewer than 2 images' in out['se_note']


def test_a_failed_eval_leaves_no_empty_output_file(tiny_checkpoint, tmp_path):
    code, err = run_cli(eval_main, [str(tiny_checkpoint), '--data', 'nope', '--out', str(tmp_path / 'r.json')])
    assert code == 2 and not (tmp_path / 'r.json').exists(), err


def test_checkpoints_with_edited_or_missing_contents_are_named(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    key = next(iter(state['ema']))
    state['ema'][key] = state['ema'][key] + 1
    torch.save(state, tmp_path / 'edited.pt')
    code, err = run_cli(eval_main, [str(tmp_path / 'edited.pt')])
    assert code == 2 and 'damaged or was edited' in err, err
    bare = load_checkpoint(tiny_checkpoint); del bare['ema']
    save_checkpoint(tmp_path / 'noema.pt', bare)
    code, err = run_cli(eval_main, [str(tmp_path / 'noema.pt')])
    assert code == 2 and "no 'ema' entry" in err, err
    nan = load_checkpoint(tiny_checkpoint); nan['ema'][key] = torch.full_like(nan['ema'][key], float('nan'))
    save_checkpoint(tmp_path / 'nan.pt', nan)
    code, err = run_cli(sample_main, [str(tmp_path / 'nan.pt'), '--n', '2', '--steps', '2'])
    assert code == 2 and 'non-finite' in err, err
    code, err = run_cli(eval_main, [str(tiny_checkpoint), '--device', 'cuda:3'])
    assert code == 2 and 'cuda:3' in err and 'unreadable' not in err, err


def test_non_finite_fields_stop_the_ode_with_one_line(tiny_checkpoint):
    from mulan_nb.likelihood import ode_bpd
    model, _ = model_from_checkpoint(tiny_checkpoint)
    with torch.no_grad(): next(model.denoiser.parameters()).fill_(float('inf'))
    with pytest.raises(FloatingPointError, match='not finite at t = 0'):
        ode_bpd(model, torch.zeros(1, 1, 8, 8, dtype=torch.long), divergence='hutchinson')
    with pytest.raises(ValueError, match='non-finite'):
        from mulan_nb.sampling import sample
        sample(MuLAN.from_preset('digits-mulan', channels=8, n_blocks=1), 2, T=2, c=torch.full((2, 8), float('nan')))


def test_floats_where_counts_are_expected_are_value_errors():
    from mulan_nb.likelihood import dense_elbo
    from mulan_nb.dequantization import dequantize
    from mulan_nb.pf_ode import divergence_probes
    from mulan_nb.sampling import sample
    model, x = MuLAN.from_preset('digits-mulan', channels=8, n_blocks=1), torch.zeros(2, 1, 8, 8, dtype=torch.long)
    for call, words in [(lambda: dense_elbo(model, x, n_t=2.5), 'n_t must be an integer, got 2.5'),
                        (lambda: dense_elbo(model, x, batch_size=0), 'batch_size must be >= 1'),
                        (lambda: dequantize(x, 17, torch.tensor(-8.), n_samples=2.0), 'n_samples must be an integer'),
                        (lambda: divergence_probes((2, 64), 'hutchinson', n_probes=True), 'n_probes must be an integer'),
                        (lambda: sample(model, 2.5, T=3), 'n and T must be integers')]:
        with pytest.raises(ValueError, match=words.replace('(', r'\(')): call()


def test_sampling_decodes_in_chunks_with_the_same_result(monkeypatch):
    "The decoder's (n, D, K) logits are built a few rows at a time: many samples cannot fail at the very end for memory."
    import mulan_nb.sampling as sampling
    model = MuLAN.from_preset('digits-mulan', channels=8, n_blocks=1).eval()
    whole = sampling.sample(model, 40, T=3, generator=torch.Generator().manual_seed(0))
    calls = []
    real = sampling.decoder_logprobs
    monkeypatch.setattr(sampling, 'decoder_logprobs', lambda z, g, K: (calls.append(len(z)), real(z, g, K))[1])
    monkeypatch.setattr(sampling, 'DECODE_LOGITS', 16 * 64 * 17)   # 16 images' logits per chunk
    chunked = sampling.sample(model, 40, T=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole, chunked) and calls == [16, 16, 8]


def test_a_run_killed_during_a_checkpointed_evaluation_redoes_it_on_resume(tmp_path, monkeypatch):
    "Checkpoint first, then the evaluation: a kill inside it must not lose that step's test row."
    cfg = lambda steps: TrainConfig(model=dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1), steps=steps, batch_size=16,
                                    ckpt_every=2, eval_every=2, eval_n_t=1, final_n_t=1, log_every=1, out=str(tmp_path / 'a'), n_samples=0)
    real = Trainer.evaluate
    def killed(self, n_t):
        if self.step == 2: raise KeyboardInterrupt('SIGTERM')
        return real(self, n_t)
    monkeypatch.setattr(Trainer, 'evaluate', killed)
    with pytest.raises(KeyboardInterrupt, match='checkpoint of step 2'): Trainer(cfg(4), progress=False).fit()
    monkeypatch.setattr(Trainer, 'evaluate', real)
    Trainer(cfg(4), resume=True, progress=False).fit()
    ref = TrainConfig(**{**cfg(4).__dict__, 'out': str(tmp_path / 'b')})
    Trainer(ref, progress=False).fit()
    rows = lambda d: [(r['kind'], r['step'], r['bpd']) for r in map(json.loads, (tmp_path / d / 'metrics.jsonl').read_text().splitlines())]
    assert rows('a') == rows('b') and ('eval', 2) in [r[:2] for r in rows('a')]


def test_a_resume_without_the_runs_callback_or_with_other_settings_is_refused(tmp_path):
    grid = ['--optimise-times-every', '1', '--optimise-times-warmup', '0']
    assert train(tmp_path, '--steps', '2', *grid)[0] == 0
    code, err = train(tmp_path, '--steps', '3', '--resume')
    assert code == 2 and "trained with the callbacks ['sampling_times']" in err, err
    code, err = train(tmp_path, '--steps', '3', '--resume', '--optimise-times-every', '2', '--optimise-times-warmup', '0')
    assert code == 2 and "'every': 1" in err, err
    assert train(tmp_path, '--steps', '3', '--resume', *grid)[0] == 0


def test_a_stated_weight_decay_change_is_applied(tmp_path, monkeypatch):
    assert train(tmp_path, '--steps', '2')[0] == 0
    seen = []
    real = Trainer.one_step
    monkeypatch.setattr(Trainer, 'one_step', lambda self: (seen.append(self.opt.param_groups[0]['weight_decay']), real(self))[1])
    code, err = train(tmp_path, '--steps', '3', '--weight-decay', '0.05', '--resume')
    assert code == 0 and 'weight_decay 0.01 -> 0.05' in err and seen == [0.05], (err, seen)


def test_a_failed_set_up_leaves_the_folder_free(tmp_path):
    assert train(tmp_path, '--steps', '2')[0] == 0
    with pytest.raises(ValueError, match='cannot resume') as kept:   # kept alive, as IPython keeps the last traceback (and the Trainer in it)
        Trainer(TrainConfig(model=dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1), steps=3, batch_size=16, seed=1,
                            out=str(tmp_path), n_samples=0, eval_every=0), resume=True, progress=False)
    code, err = train(tmp_path, '--steps', '3', '--resume')
    assert code == 0 and kept.value is not None, err


def test_a_run_whose_test_errors_are_null_resumes(tmp_path):
    "One test image: the standard error is undefined, stored as null; a resume reads it back and plots it."
    np.save(tmp_path / 'd.npy', np.random.default_rng(0).integers(0, 17, (15, 8, 8)))
    more = ['--data', str(tmp_path / 'd.npy'), '--levels', '17', '--batch-size', '8', '--eval-every', '1']
    assert train(tmp_path / 'run', '--steps', '2', *more)[0] == 0
    code, err = train(tmp_path / 'run', '--steps', '3', '--resume', *more)
    assert code == 0, err
    res = json.loads((tmp_path / 'run' / 'result.json').read_text())
    assert res['test_se'] is None and 'fewer than 2 images' in res['test_se_note'] and res['steps'] == 3
