"""Training one phase: where it starts (start), one epoch's train/evaluate steps under the
device's precision (step), what an epoch produced and early stopping (epochs), the loss of every
strategy (losses), pure schedules (schedules), the phase's local folder with the original file
names (outputs), and the loop that ties them together (train)."""
