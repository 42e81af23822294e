"""Layer 1, the vocabulary: what a compression method is and works with, free of any model.

Methods and their configs (``method``), the hook specifications (``hookspecs``), token states and the
decisions a decoder stage returns (``tokens``, ``decisions``), encoder signals (``signals``), pure tensor
operations (``select``, ``matching``), stacks and their validation (``stack``), the registry
(``registry``), the FLOPs model (``flops``: from token counts or a config), method weights files
(``weights``) and errors. Public: plugins import from here and from the top level.
"""
