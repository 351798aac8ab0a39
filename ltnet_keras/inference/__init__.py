"""From a trained run to label maps: ``segment`` (run directory + scans -> label maps on each
scan's own grid), ``refine`` (test-time refinement of one scan's forward field), ``fusion``
(majority vote, joint label fusion of several atlases' label maps)."""
