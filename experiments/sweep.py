"""The pieces that the experiment scripts share: train one run (or resume it, or skip it when finished, refusing a
folder that holds another run), read its record back, the mean with its standard error over seeds, the command-line
parser of the 1000-step training settings and the folder flags, and the summary rewritten after every run."""
import argparse, json, math, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TERMS = ('diffusion_bpd', 'recon_bpd', 'prior_bpd', 'latent_bpd')


def mean_se(values, single=float('nan')):
    "Mean and its standard error over seeds (sample std / √n; `single` for one value: None keeps a bare NaN out of a JSON file)."
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(n) if n > 1 else single)


def pm(m, se, digits=4, scale=1, unit=''):
    "'m ± se' (or 'm (one seed)' when se is None), scaled and with a unit."
    return f"{scale * m:.{digits}f}{unit}" + (f" ± {scale * se:.{digits}f}{unit}" if se is not None else ' (one seed)')


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


def reuse_mismatch(state:dict, cfg) -> list[str]:
    "Why the finished run of checkpoint `state` is not the run `cfg` would train ([] when it is): training fields (but `out`, `model`; missing ones at their defaults), the model config, the step."
    from dataclasses import asdict, fields, MISSING
    from mulan_nb.model import MuLANConfig
    from mulan_nb.training import TrainConfig
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    new, old = asdict(cfg), {**defaults, **state.get('train', {})}
    diff = [f"{k} {old.get(k)!r} vs {v!r}" for k, v in new.items() if k not in ('out', 'model') and old.get(k) != v]
    old_model, new_model = asdict(MuLANConfig(**state['config'])), asdict(cfg.model_config())   # old configs get the defaults of newer fields
    diff += [f"model.{k} {old_model.get(k)!r} vs {v!r}" for k, v in new_model.items() if old_model.get(k) != v]
    if state.get('step') != cfg.steps: diff.append(f"step {state.get('step')!r} vs {cfg.steps!r}")
    return diff


def reused_run(folder:Path, cfg, name=str) -> tuple:
    "(folder, None) when `folder` holds the finished run that `cfg` would train, else (None, why not), naming the folder by `name(folder)`."
    if not (folder / 'result.json').exists(): return None, f"{name(folder)} holds no finished run"
    from mulan_nb.model import load_checkpoint
    diff = reuse_mismatch(load_checkpoint(folder / 'checkpoint.pt'), cfg)
    return (folder, None) if not diff else (None, f"{name(folder)} differs: {'; '.join(diff)}")


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


def experiment_parser(doc:str,         # the script's docstring: its first line describes the parser
                      choose:str,       # the list flag that picks what to run, e.g. '--configs'
                      names,            # what it can pick, all by default
                      steps:int=1000,   # the default of --steps
                      data:bool=True,   # with --data (default digits)
                      **options):       # more keywords of the list flag, e.g. help
    "A parser with --data, the list flag `choose`, then --seeds, --steps, --batch-size, --eval-every, --eval-n-t, --final-n-t, --n-samples, defaulting to the settings of experiments/compare.py's 1000-step sweep."
    p = argparse.ArgumentParser(description=doc.split('\n')[0])
    if data: p.add_argument('--data', default='digits')
    p.add_argument(choose, nargs='*', default=list(names), **options)
    p.add_argument('--seeds', type=int, nargs='*', default=[0, 1, 2])
    p.add_argument('--steps', type=int, default=steps); p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--eval-every', type=int, default=100); p.add_argument('--eval-n-t', type=int, default=8)
    p.add_argument('--final-n-t', type=int, default=128); p.add_argument('--n-samples', type=int, default=0)
    return p


def add_folder_arguments(p, runs:str, reuse_help:str|None=None):
    "Add to the parser `p` --runs (default experiments/runs/`runs`), with `reuse_help` --reuse (default schedule_init.py's runs), and --results (default experiments/results)."
    p.add_argument('--runs', default=str(ROOT / 'experiments/runs' / runs))
    if reuse_help is not None: p.add_argument('--reuse', default=str(ROOT / 'experiments/runs/schedule-init'), help=reuse_help)
    p.add_argument('--results', default=str(ROOT / 'experiments/results'))


def parse_run_arguments(p, argv, **choices) -> dict:
    "The arguments `argv` (None: sys.argv[1:]) parsed by `p`, as a dict; a list flag naming something outside its `choices` (flag name=the allowed names, shown as given) is refused with p.error."
    a = vars(p.parse_args(argv))
    for key, allowed in choices.items():
        if set(a[key]) - set(allowed): p.error(f"unknown {key} {sorted(set(a[key]) - set(allowed))}: choose from {allowed}")
    return a


class Summary:
    "An experiment's summary, rewritten after every finished run: results/{name}.json, .md and (with a figure) .png, `name` being the script's with '-' for '_'."
    def __init__(self, script:str,     # the script's file name, e.g. 'official_config.py', for the summary's name and command line
                 argv,                  # the arguments main got (None: sys.argv[1:]), for the command line
                 results,               # the folder of the summary, made here
                 runs_planned:int,      # how many runs this call means to have finished
                 summarise,             # the records of the finished runs -> the summary (a dict)
                 markdown,              # summary -> its Markdown table
                 figure=None):          # (summary, path) -> draws the .png; None: no figure
        self.script, self.summarise, self.markdown, self.figure, self.runs_planned = script, summarise, markdown, figure, runs_planned
        self.command = f'OMP_NUM_THREADS=1 python experiments/{script} ' + ' '.join(sys.argv[1:] if argv is None else argv)
        self.out, self.name, self.records = Path(results), Path(script).stem.replace('_', '-'), []
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    def write(self) -> dict:
        "Summarise the records so far, with the wall time since the start, the runs done and planned and the command line; write and return it."
        summary = self.summarise(self.records)
        summary.update(wall_seconds_this_call=time.perf_counter() - self.t0, runs_done=len(self.records), runs_planned=self.runs_planned, command=self.command)
        from mulan_nb.model import write_atomic   # here, not at the top: --help and the parsers need no torch
        text = json.dumps(summary, indent=1)
        write_atomic(self.out / f'{self.name}.json', lambda fh: fh.write(text))   # a kill mid-write leaves the last summary whole
        write_atomic(self.out / f'{self.name}.md', lambda fh: fh.write(self.markdown(summary)))
        if self.figure is not None: self.figure(summary, self.out / f'{self.name}.png')
        return summary

    def add(self, record:dict, line:str):
        "Keep the record of a finished run, print `line` about it and rewrite the summary."
        self.records.append(record)
        print(line, flush=True)
        self.write()

    def finish(self, need_runs:bool=True):
        "Write the summary and print its Markdown and where it went; with `need_runs` and no finished run, exit with status 1 instead."
        if need_runs and not self.records: sys.stderr.write(f'{self.script}: no finished runs\n'); sys.exit(1)
        summary = self.write()
        print(self.markdown(summary)); print(f"{len(self.records)} runs, {summary['wall_seconds_this_call']:.0f} s this call; {self.out / f'{self.name}.json'}")
