"""Long-context evaluation (``python -m spb2_jax.eval {ppl,passkey,niah,recall,speed}``): perplexity and the loss
curve over long windows (sequence-sharded on a mesh), passkey / needle-in-a-haystack heatmaps, associative recall
vs length, prefill / decode speed and memory curves against the all-full-attention twin, and a memory model.
Every subcommand writes ``results.json`` (config, commit, device, mesh, numbers) beside its PNGs."""

from spb2_jax.eval.common import EvalError, write_results
from spb2_jax.eval.memory import predict_memory
from spb2_jax.eval.ppl import perplexity
from spb2_jax.eval.recall import recall_accuracy, recall_grid
from spb2_jax.eval.retrieval import retrieval_grid
from spb2_jax.eval.speed import full_attention_twin, speed_curves, sse_swa_twin

__all__ = ["EvalError", "full_attention_twin", "perplexity", "predict_memory", "recall_accuracy", "recall_grid",
           "retrieval_grid", "speed_curves", "sse_swa_twin", "write_results"]
