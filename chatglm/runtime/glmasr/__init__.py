"""GLM-ASR's rotary audio encoders on our own ggml graph: the log-mel front end (:mod:`.mel`), the projector's
weights (:mod:`.weights`), the encoder graph (:mod:`.graph`) and the media context over llama.cpp (:mod:`.context`)."""
