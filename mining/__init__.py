"""D-PoDL mining: datasets, HtoA, the FreezeNet watermark, training, PreHash/PostHash."""
