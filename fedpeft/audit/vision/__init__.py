"""Vision side of the audit: public digit images, a LoRA-adapted CNN, and victim simulation."""
