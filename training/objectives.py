"""Training objectives for a reranker over each question's ``n`` candidates: G-Rerank and its baselines.

Every objective takes the reranker's scores ``w`` ``[B, n]``. The reranker's distribution over candidates is
``p_w = softmax(kappa * w)``, the same scaling the Gumbel mask uses, so ``--kappa`` means one thing for all.

* ``grerank`` (DESIGN.md section 2): the reader's answer NLL under a relaxed top-k Gumbel mask of ``w``,
  backpropagated through the reader's attention. ``nested``: averaged over the relaxed top-1, ..., top-k
  masks of the same draws, so which document ranks first counts too (a top-k loss is blind to the order
  within the k the reader reads; that order is answer Recall@1).
* ``expected`` (an ablation that separates G-Rerank's objective from its estimator): the exact expectation
  of the reader's answer NLL when the k documents it reads are drawn as the relaxed mask stands for (Gumbel
  top-k from ``p_w``), ``sum_S P_w(S) NLL(S)`` over every k-subset. The reader is frozen and reads each
  subset with a hard mask, so the ``NLL(S)`` are constants cached like the baselines' signals; affordable
  where ``n choose k`` is small (45 for n = 10, k = 2). ``nested``: averaged over k' = 1..k.
* ``pdist`` (perplexity distillation, Izacard et al. 2022): ``KL(q || p_w)`` with
  ``q = softmax(log P(a|q,d_i))``, the reader's answer likelihood given each candidate alone.
* ``emdr`` (EMDR², Sachan et al. 2021): the candidates as a latent variable,
  ``-log sum_i p_w(i) P(a|q,d_i)``.
* ``loop`` (leave-one-out perplexity distillation, Atlas, Izacard et al. 2022): ``KL(q || p_w)`` with
  ``q = softmax(-log P(a|q, D \\ d_i))``: the candidates whose removal from the full set lowers the answer's
  likelihood most get the most weight.
* ``adist`` (attention distillation, Izacard & Grave 2021): ``KL(q || p_w)`` with ``q = softmax(a)``, ``a_i``
  the reader's attention logits on candidate ``i`` when it reads all of them, averaged over layers, heads and
  the candidate's tokens (:meth:`grerank.decoder_reader.DecoderReader.document_attention`).
* ``supervised``: binary cross-entropy of ``kappa * (w - mean(w))`` against the supporting-paragraph labels;
  an upper reference that uses labels the other objectives never see. Centred per question: a bi-encoder's
  scores are cosines, and with a fixed threshold at 0 the eight negatives of ten reward lowering every
  cosine (uncentred, dev support Recall@2 on the shipped split fell from 63 to 40 in one epoch).

Plus the anchor ``KL(p_start || p_w)`` any objective can add, which keeps what the starting reranker knew.
"""

from __future__ import annotations

import itertools

import torch

from grerank.gumbel_topk import (
    antithetic_gumbel_noise,
    relaxed_prefix_masks,
    standardized,
    subset_probabilities,
)

OBJECTIVES = ("grerank", "expected", "pdist", "emdr", "loop", "adist", "supervised")
# Objectives whose targets are the frozen reader's signals (training.reader_signals), computed once before
# training; ``{k}`` is the number of documents the reader sees.
NEEDS_READER_SIGNALS = {
    "expected": "subset_nll_k{k}",
    "pdist": "loglik",
    "emdr": "loglik",
    "loop": "loo_loglik",
    "adist": "attention_score",
}


def levels(k: int, nested: bool) -> list[int]:
    """How many documents the reader reads in each term of the loss: ``[1, ..., k]`` nested, else ``[k]``."""
    return list(range(1, k + 1)) if nested else [k]


def signal_kinds(objective: str, k: int, nested: bool = False) -> list[str]:
    """The reader signals ``objective`` trains on (none for ``grerank`` and ``supervised``)."""
    kind = NEEDS_READER_SIGNALS.get(objective)
    if kind is None:
        return []
    return list(dict.fromkeys(kind.format(k=level) for level in levels(k, nested)))


def _log_p(scores: torch.Tensor, kappa: float) -> torch.Tensor:
    return torch.log_softmax(kappa * scores, dim=-1)


def grerank_nll(
    scores: torch.Tensor,
    reader,
    questions: list[str],
    answers: list[str],
    states: list[list[torch.Tensor]],
    k: int,
    tau: float,
    kappa: float,
    generator: torch.Generator,
    draws: int = 1,
    antithetic: bool = False,
    standardize: bool = False,
    nested: bool = False,
) -> torch.Tensor:
    """The reader's answer NLL under relaxed top-k masks of ``scores``, averaged over the batch and over
    ``draws`` masks per question: more draws, less gradient noise, at the price of the question and answer
    tokens only (the document states are shared). ``antithetic``: the draws of a question come in pairs of
    noise ``u`` and ``1 - u``; ``standardize``: scores are standardised per question before ``kappa``;
    ``nested``: also the relaxed top-1 .. top-(k - 1) masks of the same draws (k reader passes a draw)."""
    if standardize:
        scores = standardized(scores)
    rows = scores.repeat_interleave(draws, dim=0)
    noise = None
    if antithetic:
        shape = (k, len(questions), draws, scores.shape[-1])
        noise = antithetic_gumbel_noise(shape, 2, generator, device=scores.device).flatten(1, 2)
    masks = relaxed_prefix_masks(rows, k, tau, kappa, generator, noise)
    masks = masks[[level - 1 for level in levels(k, nested)]]  # [levels, B * draws, n]
    repeat = lambda items: [item for item in items for _ in range(draws)] * len(masks)  # noqa: E731
    return reader.answer_nll(repeat(questions), repeat(answers), repeat(states), masks.flatten(0, 1)).mean()


def k_subsets(n: int, k: int) -> torch.Tensor:
    """Every k-subset of n candidates ``[n choose k, k]``, in ``itertools.combinations`` order (the order of
    the ``subset_nll`` signal)."""
    return torch.tensor(list(itertools.combinations(range(n), k)))


def expected_nll(
    scores: torch.Tensor, subset_nll: torch.Tensor, k: int, kappa: float, standardize: bool = False
) -> torch.Tensor:
    """``sum_S P_w(S) NLL(S)`` per question, averaged: ``subset_nll`` ``[B, n choose k]``."""
    if standardize:
        scores = standardized(scores)
    subsets = k_subsets(scores.shape[-1], k).to(scores.device)
    probabilities = subset_probabilities(_log_p(scores, kappa), subsets)
    return (probabilities * subset_nll.to(probabilities.dtype)).sum(-1).mean()


def kl_to_target(scores: torch.Tensor, target_log_q: torch.Tensor, kappa: float) -> torch.Tensor:
    """``KL(q || p_w)`` per question, averaged; ``target_log_q`` are unnormalised log-weights."""
    log_q = torch.log_softmax(target_log_q.float(), dim=-1)
    return (log_q.exp() * (log_q - _log_p(scores, kappa))).sum(-1).mean()


def pdist_loss(scores: torch.Tensor, answer_loglik: torch.Tensor, kappa: float) -> torch.Tensor:
    return kl_to_target(scores, answer_loglik, kappa)


def emdr_loss(scores: torch.Tensor, answer_loglik: torch.Tensor, kappa: float) -> torch.Tensor:
    return -torch.logsumexp(_log_p(scores, kappa) + answer_loglik.float(), dim=-1).mean()


def loop_loss(scores: torch.Tensor, leave_one_out_loglik: torch.Tensor, kappa: float) -> torch.Tensor:
    return kl_to_target(scores, -leave_one_out_loglik, kappa)


def adist_loss(scores: torch.Tensor, attention_score: torch.Tensor, kappa: float) -> torch.Tensor:
    return kl_to_target(scores, attention_score, kappa)


def supervised_loss(scores: torch.Tensor, supporting: torch.Tensor, kappa: float) -> torch.Tensor:
    logits = kappa * (scores.float() - scores.float().mean(-1, keepdim=True))
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, supporting.float())


def anchor_kl(scores: torch.Tensor, start_scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_start || p) between softmax distributions over each question's candidates."""
    log_p = torch.log_softmax(scores / temperature, dim=-1)
    log_start = torch.log_softmax(start_scores / temperature, dim=-1)
    return (log_start.exp() * (log_start - log_p)).sum(-1).mean()


DISTILLATION = {"pdist": pdist_loss, "emdr": emdr_loss, "loop": loop_loss, "adist": adist_loss}
