"""Run modes beside RL/SFT (``train.py`` dispatches on ``mode``): ``rm`` (reward-model training, ``modes/rm.py``)."""
