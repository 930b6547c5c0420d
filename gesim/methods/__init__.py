"""Mitigations of gradient entanglement and the neighbouring methods, in one frame.

* :mod:`gesim.methods.pairwise`: pairwise-normalised gradient descent (PNGD) and reward
  calibration, as simulator rules (``pngd``, ``calibrated``) and Transformer objectives;
* :mod:`gesim.methods.masking`: sparsity-regularised token masking (learned word weights, L1);
* :mod:`gesim.methods.fish`: Fish (Shi et al. 2022), its expansion check, and the
  Fish-sequenced margin step that treats "raise chosen" and "lower rejected" as two domains;
* :mod:`gesim.methods.omo`: the Online Merging Optimizer (OnDARE, OnTIES) around AdamW;
* :mod:`gesim.methods.averaging`: model averaging and HMA;
* :mod:`gesim.methods.harness`: pretrain -> SFT -> preference, scored on reward and alignment tax;
* :mod:`gesim.methods.tax`: the alignment-tax study over seeds and the seed papers' three claims;
* :mod:`gesim.methods.mitigation`: the mitigation study over seeds where DPO lowers the chosen log-prob.

Importing :mod:`gesim.methods.pairwise` registers its simulator rules.
"""
