"""What the orchestration costs, and how it grows with the pool: stage I generation with a
model-free backend that replays the recorded weak outputs (models/backends/replay.py), so every
second measured is the service's own (claims, heartbeats, database writes, the broker, worker
processes). Beyond the 7,000 real GSM8K pool questions the pool is synthetic: each real question
again with a copy number, and its recorded response.

    python bench/orchestration.py [--questions 7000 70000 1000000] [--workers 1 2] [--no-in-process]
                                  [--redis URL] [--postgres URL] [--keep]
    python bench/orchestration.py --status-only 1000000

For each size, the same work four ways (every pool question answered by the weak and the strong
voter, answers extracted):

- compute: replay + clean + answer extraction in a loop, no database, no broker (the floor);
- in-process: the round's generation jobs run one after another in this process through the job
  runner (claim, heartbeat, fenced writes to PostgreSQL), no Celery;
- N workers: the round planned and sent as `w2sctl round start` does → Redis → N `w2sctl worker
  --role weak,strong` processes → PostgreSQL, timed from the planning until every generation job
  is done. A `w2sctl worker --role control` process runs beside them; once generation is done it
  runs the vote over the whole pool, and its peak resident memory (VmHWM, the largest of its
  processes) is reported.

Orchestration overhead per question = (wall time − compute wall time) / questions; the ratio is
to the first (smallest) size. At the largest size, once the vote is done, the status commands are
timed in this process (`round status`, `jobs --round`, `queues`, `round report`, the monitoring
counts), the interpreter's start-up left out; the broker is left out of `round status` and
`queues` (its census waits a fixed Celery inspect timeout for worker replies, whatever the size).

`--status-only N` measures the read side alone at a size the 2-core machine cannot generate in
the time: it bulk-loads (COPY) N questions and 2N generations into a round planned by the real
`start_round`, marks generation done, plans the vote, times the status commands, runs the vote
job in a child process (its wall time and peak memory: the control worker's, at N), times the
status commands again, and prints EXPLAIN of the queries behind them.

`--keep` leaves each size's database in place (its URL is printed; the round cancelled after the
timings) to query after, e.g. with EXPLAIN ANALYZE; drop it when done.

Needs the real PostgreSQL and Redis (the test servers: 127.0.0.1:5432 and :6379).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
POOL = SHARED / "gsm8k" / "train_2.jsonl"
WEAK_OUTPUTS = SHARED / "reference" / "weak_outputs" / "gsm8k_train_2.llama2_7b.jsonl"
W2SCTL = [sys.executable, "-m", "cli"]
ROUND = {"stage": "sft", "weak": "weak", "strong": "strong", "pool": "pool", "eval": {"dataset": "eval", "limit": 10},
         "demonstrations": 0, "variants": ["weak"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, nargs="+", default=[7000])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--no-in-process", dest="in_process", action="store_false")
    parser.add_argument("--status-only", type=int, metavar="N", help="bulk-load N questions and time the reads only")
    parser.add_argument("--redis", default=f"redis://127.0.0.1:6379/{os.environ.get('W2S_TEST_REDIS_DB', '15')}")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument("--keep", action="store_true", help="keep each size's database (its URL is printed) to query after")
    parser.add_argument("--profile-sql", action="store_true",
                        help="in-process run: time every SQL statement (count, total, mean by statement text) and "
                             "each job (first and last tenth of the round)")
    args = parser.parse_args(argv)
    for path in (POOL, WEAK_OUTPUTS):
        if not path.is_file():
            sys.exit(f"missing {path} (../shared/data beside the repository)")
    if args.status_only:
        with fresh_database(args) as (work, env):
            status_only(work, env, args.status_only)
        return

    table = []
    for n in args.questions:
        last = n == args.questions[-1]
        with fresh_database(args) as (work, env):
            setup(work, n)
            results = {"compute": compute_only(work, n)}
            if args.in_process:
                results["in-process"] = in_process(n, profile_sql=args.profile_sql)
            for count in args.workers:
                results[f"{count} worker{'s' if count > 1 else ''}"] = distributed(work, count, n, env, time_status=last)
        table.append((n, results))
        print_table(table)  # after each size: a long run shows its figures as they come


def print_table(table: list[tuple[int, dict]]) -> None:
    first: dict[str, float] = {}
    print(f"\nstage I generation, N questions x 2 voters (replayed weak outputs), chunk 256, {os.cpu_count()} CPUs")
    print(f"{'questions':>9} {'run':<11} {'wall s':>8} {'questions/s':>11} {'overhead ms/q':>13} {'vs first':>8} "
          f"{'jobs':>5} {'control peak MiB':>16} {'vote s':>7}")
    for n, results in table:
        floor = results["compute"]["wall_s"]
        for name, r in results.items():
            overhead = (r["wall_s"] - floor) / n * 1000
            first.setdefault(name, overhead)
            ratio = overhead / first[name] if name != "compute" and first[name] > 0 else None
            peak, vote = r.get("control_peak_mib"), r.get("vote_s")
            print(f"{n:>9} {name:<11} {r['wall_s']:>8.2f} {n / r['wall_s']:>11.1f} {overhead:>13.3f} "
                  f"{'' if ratio is None else f'{ratio:.2f}x':>8} {r.get('jobs', '-'):>5} "
                  f"{'' if peak is None else f'{peak:.0f}':>16} {'' if vote is None else f'{vote:.1f}':>7}")
    for n, results in table:
        for name, r in results.items():
            if "status" in r:
                print(f"\nstatus commands at {n} questions (after the vote; {name}):")
                print_latencies(r["status"])


class fresh_database:
    """A new PostgreSQL database, a flushed Redis database and a work directory; dropped after."""

    def __init__(self, args) -> None:
        self.args = args

    def __enter__(self) -> tuple[Path, dict]:
        import psycopg
        import redis

        self.work = Path(tempfile.mkdtemp(prefix="w2s-bench-orch-"))
        self.name = f"w2s_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.args.postgres, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        url = self.args.postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{self.name}"
        redis.Redis.from_url(self.args.redis).flushdb()
        env = {"W2S_DATABASE_URL": url, "W2S_BROKER_URL": self.args.redis, "W2S_HOME": str(self.work / "home"),
               "W2S_CHECKPOINT_DIR": str(self.work / "checkpoints"), "W2S_WATCHDOG_S": "0"}
        os.environ.update(env)
        return self.work, env

    def __exit__(self, *exc) -> None:
        import psycopg

        from db.session import dispose_engines

        dispose_engines()
        if self.args.keep:
            print(f"kept database: {os.environ['W2S_DATABASE_URL']} (drop it when done)", flush=True)
            return
        with psycopg.connect(self.args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# --- the pool ------------------------------------------------------------------------------------


def pool_records(n: int) -> tuple[list[dict], list[dict]]:
    """n pool questions and their recorded weak responses: the real ones, then synthetic copies
    (question i is real question i mod 7,000 with its copy number appended)."""
    real = [json.loads(line) for line in POOL.read_text().splitlines() if line.strip()]
    outputs = [json.loads(line) for line in WEAK_OUTPUTS.read_text().splitlines() if line.strip()]
    response = {r["prompt"]: r["response"] for r in outputs}
    questions, records = [], []
    for i in range(n):
        base = real[i % len(real)]
        text = base["question"] if i < len(real) else f"{base['question']} (copy {i // len(real)})"
        questions.append({"question": text, "answer": base["answer"]})
        records.append({"prompt": f"Question: {text}\nAnswer:",
                        "response": response[f"Question: {base['question']}\nAnswer:"]})
    return questions, records


def setup(work: Path, questions: int) -> None:
    from db.session import session_scope, upgrade
    from models.backends.replay import write_replay
    from services.registry import import_dataset, register_model

    pool_questions, records = pool_records(questions)
    replay = write_replay(work / "replay-weak", records)
    pool = work / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": q["question"]}) + "\n" for q in pool_questions))
    # The promotion gate's eval set must be labelled and differ from the pool: ten pool questions
    # with their gold answers (the replay knows them); the bench stops before it matters.
    evaluation = work / "eval.jsonl"
    evaluation.write_text("".join(line + "\n" for line in POOL.read_text().splitlines()[:10]))
    upgrade(os.environ["W2S_DATABASE_URL"])
    with session_scope(os.environ["W2S_DATABASE_URL"]) as session:
        import_dataset(session, pool, name="pool", task="gsm8k", labelled=False)
        import_dataset(session, evaluation, name="eval", task="gsm8k", labelled=True)
        register_model(session, name="weak", path=replay, role="weak")
        register_model(session, name="strong", path=replay, role="strong")


# --- the runs ------------------------------------------------------------------------------------


def compute_only(work: Path, n: int) -> dict:
    from models.answers import extract_answer
    from models.backends import load_backend
    from models.generation import generate
    from models.prompts import clean_response, zero_shot

    questions = [q["question"] for q in pool_records(n)[0]]
    start = time.perf_counter()
    loaded = load_backend(work / "replay-weak")
    for _voter in ("weak", "strong"):
        for completions in generate(loaded, [zero_shot(q) for q in questions], max_new_tokens=1024):
            text = clean_response(completions[0].text)
            extract_answer(text, "gsm8k")
    return {"wall_s": time.perf_counter() - start}


def in_process(n: int, *, profile_sql: bool = False) -> dict:
    from sqlalchemy import select

    from db.schema import Job
    from db.session import session_scope
    from services.config import parse_round_config
    from services.rounds import cancel_round, start_round
    from services.settings import load_settings
    from workers.runner import run_job
    from workers.steps import run_generate

    settings = load_settings()
    url = settings.database_url
    start = time.perf_counter()
    with session_scope(url) as session:
        round_, _ = start_round(session, parse_round_config({**ROUND, "pool_limit": n}), settings.delivery)
        round_id = round_.id
        jobs = list(session.scalars(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate")))
    statements = SQLTimes() if profile_sql else None
    job_s = []
    for job_id in jobs:
        began = time.perf_counter()
        assert run_job(job_id, run_generate, settings=settings, enqueue=lambda *a, **k: None) == "done"
        job_s.append(time.perf_counter() - began)
    wall = time.perf_counter() - start
    if statements is not None:
        statements.stop()
        statements.report(n, len(jobs))
        tenth = max(1, len(job_s) // 10)
        print(f"  per job: mean {sum(job_s) / len(job_s) * 1000:.1f} ms; first tenth "
              f"{sum(job_s[:tenth]) / tenth * 1000:.1f} ms, last tenth {sum(job_s[-tenth:]) / tenth * 1000:.1f} ms",
              flush=True)
    with session_scope(url) as session:
        cancel_round(session, round_id, settings.delivery, "benchmark: generation measured")
    return {"wall_s": wall, "jobs": len(jobs)}


class SQLTimes:
    """Every statement's wall time, from SQLAlchemy's cursor events, summed by statement text."""

    def __init__(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        self.times: dict[str, list[float]] = {}
        self._event, self._engine = event, Engine
        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info.setdefault("w2s_bench_started", []).append(time.perf_counter())

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        took = time.perf_counter() - conn.info["w2s_bench_started"].pop()
        entry = self.times.setdefault(" ".join(statement.split()), [0, 0.0])
        entry[0] += 1
        entry[1] += took

    def stop(self) -> None:
        self._event.remove(self._engine, "before_cursor_execute", self._before)
        self._event.remove(self._engine, "after_cursor_execute", self._after)

    def report(self, n: int, jobs: int) -> None:
        total = sum(t for _, t in self.times.values())
        print(f"\nSQL on the in-process path at {n} questions ({jobs} jobs): {total:.2f} s in statements, "
              f"{total / jobs * 1000:.1f} ms a job", flush=True)
        print(f"  {'count':>6} {'total s':>8} {'mean ms':>8} {'per job':>7}  statement")
        for statement, (count, took) in sorted(self.times.items(), key=lambda kv: -kv[1][1])[:15]:
            print(f"  {count:>6} {took:>8.2f} {took / count * 1000:>8.2f} {count / jobs:>7.1f}  {statement[:150]}")


def distributed(work: Path, count: int, n: int, env: dict, *, time_status: bool = False) -> dict:

    from db.session import session_scope
    from services.config import parse_round_config
    from services.rounds import cancel_round, start_round
    from services.settings import load_settings
    from workers.dispatch import JobDispatcher

    settings = load_settings({**os.environ, **env})
    url, enqueue = settings.database_url, JobDispatcher(settings).enqueue
    logs, workers = [], []
    for i, role in enumerate(["weak,strong"] * count + ["control"]):
        log = work / f"worker{count}-{i}.log"
        logs.append(log)
        workers.append(subprocess.Popen([*W2SCTL, "worker", "--role", role, "--hostname", f"bench{i}@%h",
                                         "--loglevel", "warning"],
                                        env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=REPO))
    control = workers[-1]
    try:
        wait_ready(count + 1)
        start = time.perf_counter()
        # What `w2sctl round start` does, minus the interpreter's start-up: plan, commit, send.
        with session_scope(url) as session:
            round_, job_ids = start_round(session, parse_round_config({**ROUND, "pool_limit": n}), settings.delivery)
            round_id = round_.id
        enqueue(job_ids)
        states = wait_jobs(url, round_id, "generate", logs)
        wall = time.perf_counter() - start
        vote_start = time.perf_counter()
        wait_jobs(url, round_id, "vote", logs)
        result = {"wall_s": wall, "jobs": sum(states.values()), "vote_s": time.perf_counter() - vote_start,
                  "control_peak_mib": peak_rss_mib(control.pid)}
        if time_status:
            result["status"] = status_latencies(url, round_id)
        with session_scope(url) as session:
            cancel_round(session, round_id, settings.delivery, "benchmark: generation measured")
        return result
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def wait_jobs(url: str, round_id: int, kind: str, logs: list[Path]) -> dict[str, int]:
    from sqlalchemy import func, select

    from db.schema import Job
    from db.session import session_scope

    while True:
        with session_scope(url) as session:
            states = dict(session.execute(select(Job.state, func.count()).where(
                Job.round_id == round_id, Job.kind == kind).group_by(Job.state)).all())
        if states and set(states) == {"done"}:
            return states
        if "failed" in states:
            sys.exit(f"a {kind} job failed; see {logs}")
        time.sleep(0.05)


def peak_rss_mib(pid: int) -> float:
    """The largest peak resident set (VmHWM) among a process and its descendants (Celery's pool)."""
    import psutil

    peak = 0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def wait_ready(count: int) -> None:
    """Until `count` workers answer a ping: their start-up is not part of the figures."""
    from workers.app import app

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if len(replies) >= count:
            return
    sys.exit("workers did not start within 120 s")


# --- status commands -------------------------------------------------------------------------------


def status_latencies(url: str, round_id: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per command (the best of `repeats`), run in this process through the CLI, the
    database part only (no broker URL)."""
    from click.testing import CliRunner

    from cli.main import cli
    from db.session import session_scope
    from services.monitor import jobs_by_state_and_queue, round_progress

    commands = {
        "round status": ["round", "status", str(round_id)],
        "round status --json": ["round", "status", str(round_id), "--json"],
        "jobs --round": ["jobs", "--round", str(round_id)],
        "queues": ["queues"],
        "round report": ["round", "report", str(round_id)],
    }
    out: dict[str, float] = {}
    for name, args in commands.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            result = CliRunner().invoke(cli, args, env={"W2S_BROKER_URL": None}, catch_exceptions=False)
            best = min(best, time.perf_counter() - start)
            if result.exit_code != 0:
                sys.exit(f"w2sctl {' '.join(args)} exited {result.exit_code}:\n{result.output[-2000:]}")
        out[name] = best

    from db.schema import Round

    def monitoring() -> None:  # what the worker telemetry and `round status --watch` read each refresh
        with session_scope(url) as session:
            jobs_by_state_and_queue(session)
            round_progress(session, session.get(Round, round_id))

    out["monitoring counts"] = min(_timed(monitoring) for _ in range(repeats))
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_latencies(latencies: dict[str, float]) -> None:
    for name, seconds in latencies.items():
        print(f"  {name:<22} {seconds:>7.3f} s")


# --- status only: bulk-loaded ----------------------------------------------------------------------


def status_only(work: Path, env: dict, n: int) -> None:
    from sqlalchemy import bindparam, select, text, update

    from db.schema import Dataset, Job, Round
    from db.session import get_engine, session_scope, upgrade
    from models.backends.replay import write_replay
    from services.config import parse_round_config
    from services.registry import register_model
    from services.rounds import advance, start_round
    from services.settings import load_settings

    url = os.environ["W2S_DATABASE_URL"]
    settings = load_settings()
    upgrade(url)
    pool_questions, records = pool_records(min(n, 7000))
    replay = write_replay(work / "replay-weak", records)
    evaluation = work / "eval.jsonl"
    evaluation.write_text("".join(line + "\n" for line in POOL.read_text().splitlines()[:10]))
    real = [json.loads(line) for line in POOL.read_text().splitlines() if line.strip()]
    outputs = {json.loads(line)["prompt"]: json.loads(line)["response"]
               for line in WEAK_OUTPUTS.read_text().splitlines() if line.strip()}
    t0 = time.perf_counter()
    from services.registry import import_dataset

    with session_scope(url) as session:
        import_dataset(session, evaluation, name="eval", task="gsm8k", labelled=True)
        register_model(session, name="weak", path=replay, role="weak")
        register_model(session, name="strong", path=replay, role="strong")
        pool = Dataset(name="pool", task="gsm8k", labelled=False, source="synthetic", size=n)
        session.add(pool)
        session.flush()
        pool_id = pool.id
    raw = get_engine(url).raw_connection()
    try:
        with raw.cursor() as cursor:
            with cursor.copy('COPY questions (dataset_id, "index", text, gold_answer) FROM STDIN') as copy:
                for i in range(n):
                    base = real[i % len(real)]
                    copy.write_row((pool_id, i, f"{base['question']} (copy {i // len(real)})",
                                    base["answer"].split("####")[-1].strip()))
        raw.commit()
    finally:
        raw.close()
    with session_scope(url) as session:
        round_, _ = start_round(session, parse_round_config({**ROUND, "pool_limit": n}), settings.delivery)
        round_id = round_.id
        weak_id, strong_id = round_.resolved["weak_id"], round_.resolved["strong_id"]
        chunks = [(job.id, job.step, job.payload["question_ids"]) for job in session.scalars(
            select(Job).where(Job.round_id == round_id, Job.kind == "generate"))]
    tokens: dict[int, int] = {}
    raw = get_engine(url).raw_connection()
    try:
        with raw.cursor() as cursor:
            with cursor.copy("COPY generations (round_id, job_id, question_id, checkpoint_id, voter, sample_index, "
                             "strategy, text, answer, input_tokens, output_tokens, created_at) FROM STDIN") as copy:
                now = time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime())
                for job_id, step, question_ids in chunks:
                    voter = step.split(":")[1]
                    tokens[job_id] = 0
                    for qid in question_ids:
                        base = real[(qid - 11) % len(real)]  # any real answer: the text's size is what matters
                        response = outputs.get(f"Question: {base['question']}\nAnswer:", "")
                        tokens[job_id] += len(response.split())
                        copy.write_row((round_id, job_id, qid, weak_id if voter == "weak" else strong_id, voter, 0,
                                        "zero-shot", response, response.split("####")[-1].strip(),
                                        40, len(response.split()), now))
        raw.commit()
    finally:
        raw.close()
    with session_scope(url) as session:
        sizes = {job_id: len(question_ids) for job_id, _, question_ids in chunks}
        session.execute(update(Job.__table__).where(Job.__table__.c.id == bindparam("job")), [
            {"job": job_id, "state": "done", "attempts": 1, "progress": 1.0,
             "result": {"generated": sizes[job_id], "questions": sizes[job_id], "samples_per_question": 1,
                        "output_tokens": count}} for job_id, count in tokens.items()])
        advance(session, round_id, settings.delivery)
        session.execute(text("ANALYZE"))
    print(f"loaded {n} questions, {2 * n} generations, {len(chunks)} generation jobs in "
          f"{time.perf_counter() - t0:.0f} s (round {round_id})")

    print(f"\nstatus commands at {n} questions, generation done, vote queued:")
    print_latencies(status_latencies(url, round_id))

    vote = subprocess.run([sys.executable, __file__, "--run-vote", str(round_id)], env={**os.environ, **env},
                          capture_output=True, text=True, cwd=REPO)
    if vote.returncode != 0:
        sys.exit(f"the vote job failed:\n{vote.stdout[-2000:]}\n{vote.stderr[-4000:]}")
    print(vote.stdout.strip())
    with session_scope(url) as session:
        session.execute(text("ANALYZE"))
        state = session.scalar(select(Round.state).where(Round.id == round_id))
    print(f"\nstatus commands at {n} questions, after the vote (round {state}, training queued):")
    print_latencies(status_latencies(url, round_id))
    explain(url, round_id)


def run_vote(round_id: int) -> None:
    """The vote job of a round, through the job runner, in this (child) process: its wall time
    and peak memory are the control worker's."""
    from sqlalchemy import select

    from db.schema import Job
    from db.session import session_scope
    from services.settings import load_settings
    from workers.runner import run_job
    from workers.steps import run_vote as vote_handler

    settings = load_settings()
    with session_scope(settings.database_url) as session:
        job_id = session.scalar(select(Job.id).where(Job.round_id == round_id, Job.kind == "vote"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    outcome = run_job(job_id, vote_handler, settings=settings, enqueue=lambda *a, **k: None)
    wall = time.perf_counter() - start
    with session_scope(settings.database_url) as session:
        result = session.get(Job, job_id).result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nvote job ({outcome}): {wall:.1f} s, kept {result.get('kept')} of {result.get('pool')}; "
          f"control process peak RSS {peak:.0f} MiB (after imports, before the job: {before:.0f} MiB)")


def explain(url: str, round_id: int) -> None:
    """The plans of the queries behind the status commands (top node and the index each uses)."""
    from sqlalchemy import text

    from db.session import session_scope

    queries = {
        "round status: job counts": f"SELECT step, state FROM jobs WHERE round_id = {round_id}",
        "round status: generated per voter": "SELECT voter, count(*), coalesce(sum(output_tokens), 0) FROM generations "
                                             f"WHERE round_id = {round_id} GROUP BY voter",
        "planner: step still running": f"SELECT id FROM jobs WHERE round_id = {round_id} AND step = 'generate:weak' "
                                       "AND state <> 'done' LIMIT 1",
        "queues: queued per queue": "SELECT queue, count(*) FROM jobs WHERE state = 'queued' GROUP BY queue",
        "vote: one page": "SELECT q.id FROM questions q JOIN generations w ON w.question_id = q.id AND w.round_id = "
                          f"{round_id} AND w.voter = 'weak' AND w.sample_index = 0 JOIN generations s ON "
                          f"s.question_id = q.id AND s.round_id = {round_id} AND s.voter = 'strong' AND "
                          "s.sample_index = 0 WHERE q.id IN (SELECT id FROM questions ORDER BY id LIMIT 2000)",
    }
    print("\nEXPLAIN ANALYZE (PostgreSQL):")
    with session_scope(url) as session:
        for name, sql in queries.items():
            plan = [row[0] for row in session.execute(text(f"EXPLAIN ANALYZE {sql}"))]
            words = {word for line in plan for word in line.replace("(", " ").split()}
            uses = sorted(word for word in words if word.startswith(("ix_", "uq_", "pk_")))
            took = next((line for line in plan if line.startswith("Execution Time")), "")
            print(f"  {name:<36} {plan[0].split('  (')[0].strip()[:60]:<60} {', '.join(uses) or 'no index'}; {took}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run-vote":
        run_vote(int(sys.argv[2]))
    else:
        main()
