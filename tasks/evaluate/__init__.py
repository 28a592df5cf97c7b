"""Evaluation in the paper's three metrics (WikiRoleEval), plus judge-free checks beside them.

- identity: the judge reads one question and answer and names which of the candidate characters spoke
  (the true one + random distractors of the same language); score = share of judge samples that name
  the true role (the paper's mean over its 3 samples).
- knowledge: the judge scores the answer 1-10 given the role, its profile and the turn's evidence; mean.
- rejection: the judge says whether the role declined (majority of the samples); accuracy against the
  gold label (refusing an answerable question is an error too).
Judge-free: identity by sentence embeddings (answer vs "label: description" of each candidate),
refusal and out-of-role rate by the filter chain's own classifiers (tasks/filters/role.py).

Judge output that cannot be parsed is counted (`judge_unparsable`) and leaves that sample out; an item
with no parsed sample is left out of that metric's mean. The model under test sees only the brief system
prompt, never the profile.

One concern per module: `evalset` (items from held-out characters), `judging` (answers of the model under
test, raw judge samples), `parsers` (the judge's output), `classifiers` (judge-free refusal / out-of-role),
`embedding` (judge-free identity), `scoring` (per-item results, per-language metrics), `report` (Markdown),
`plot` (PNG), `run` (one model end to end). The names below are the package's interface.
"""

from tasks.evaluate.classifiers import is_out_of_role, is_refusal
from tasks.evaluate.embedding import embed_identity
from tasks.evaluate.evalset import EvalError, build_eval_set, items_hash, pick_candidates
from tasks.evaluate.judging import JUDGE_PROMPTS, generate_answers, judge_messages, run_judge
from tasks.evaluate.parsers import parse_identity, parse_refusal, parse_score
from tasks.evaluate.plot import report_plot
from tasks.evaluate.report import report_markdown
from tasks.evaluate.run import evaluate_model
from tasks.evaluate.scoring import METRICS, aggregate, score_item

__all__ = ["JUDGE_PROMPTS", "METRICS", "EvalError", "aggregate", "build_eval_set", "embed_identity",
           "evaluate_model", "generate_answers", "is_out_of_role", "is_refusal", "items_hash", "judge_messages",
           "parse_identity", "parse_refusal", "parse_score", "pick_candidates", "report_markdown", "report_plot",
           "run_judge", "score_item"]
