"""The library the stages stand on (docs/stages.md, "Where things live"); it never imports a stage."""
