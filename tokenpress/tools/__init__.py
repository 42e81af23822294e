"""Layer 5, the tools people run: the command line (``cli``, ``cli_bench``, ``arguments``, ``outputs``),
``viz``, ``fit`` and ``calibration`` (methods' weights), and the zoo's training and model cards
(``zoo_train``, ``zoo_card``, ``zoo_options``)."""
