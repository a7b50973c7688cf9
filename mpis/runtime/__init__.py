"""Running exported graphs: the NIR node map for nirtorch (the spike runtime follows)."""
