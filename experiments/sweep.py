"""The pieces that experiments/synthetic_structure.py and experiments/official_config.py share: train one run (or resume
it, or skip it when finished, refusing a folder that holds another run), read its record back, and the mean with its
standard error over seeds."""
import json, math, statistics
from pathlib import Path

TERMS = ('diffusion_bpd', 'recon_bpd', 'prior_bpd', 'latent_bpd')


def mean_se(values):
    "Mean and its standard error over seeds (sample std / √n; NaN for one value)."
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(n) if n > 1 else float('nan'))


def train_run(cfg, callbacks=(), summary_only=False):
    "Train `cfg` (a TrainConfig) into cfg.out, resume it from its checkpoint, or skip it when finished; None when `summary_only` and not finished."
    import torch
    torch.set_num_threads(1)
    from mulan_nb.training import train
    from mulan_nb.model import MuLANConfig, load_checkpoint
    from mulan_nb.data import load_data
    out = Path(cfg.out)
    if not (out / 'result.json').exists():
        if summary_only: return None
        train(cfg, resume=(out / 'checkpoint.pt').exists(), progress=False, callbacks=list(callbacks))
    result = json.loads((out / 'result.json').read_text())
    stored = MuLANConfig(**load_checkpoint(out / 'checkpoint.pt')['config'])
    expected = cfg.model_config(load_data(cfg.data, 'test', cfg.root, cfg.K))
    if (result['steps'], result['data'], result['preset']) != (cfg.steps, cfg.data, cfg.preset) or stored != expected:
        raise ValueError(f"{out} holds a finished run of {result['steps']} steps of {result['preset']} on {result['data']} "
                         f"that is not this one ({cfg.steps} steps of {cfg.preset} with {cfg.model} on {cfg.data}): use another --runs folder")
    return result


def run_record(out) -> dict:
    "The final dense ELBO, its terms, the evaluation curve and the training time of the finished run in `out`."
    out = Path(out)
    result = json.loads((out / 'result.json').read_text())
    metrics = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    evals = [m for m in metrics if m.get('kind') == 'eval']
    trains = [m for m in metrics if m.get('kind') == 'train']   # logged every few steps with the rate since the last log
    return dict(test_bpd=result['test_bpd'], test_se=result['test_se'], estimator=result['estimator'],
                terms={k: evals[-1][k] for k in TERMS}, curve=[(m['step'], m['bpd']) for m in evals],
                parameters=result['parameters']['total'],
                train_seconds=sum((m['step'] - prev) / m['steps_per_s'] for prev, m in zip([0] + [m['step'] for m in trains], trains)))

