"""Training: the engines (DeepSpeed | plain torch), the accumulated update and collectives the learners share."""
