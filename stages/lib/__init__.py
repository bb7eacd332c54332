"""The library the stages stand on (README, "Where things live"); it never imports a stage."""
