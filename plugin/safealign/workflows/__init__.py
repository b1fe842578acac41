"""The workflows: the work several stages share, one layer below the stages.

Each module is one job, written as OpenRLHF's `cli/train_*.py` scripts are — build the settings,
strategy and models, fit, publish — on the adapter in `safealign.openrlhf`:
- `policy`: a policy trained on preference pairs (align, its ablations, distill's dDPO);
- `value_model`: a reward or cost model trained on pairs (rm);
- `student`: dSFT of a student on teacher answers (distill);
- `inference`: scoring pairs with a value model and a policy's response log-probs (rm, distill's
  best-of-n, eval);
- `rows`: which rows a run trains on, and the prompts held out to sample Ĵ_C on.
Stages pass every upstream path in (from `StageContext.upstream`); nothing here knows a run's layout.
"""
