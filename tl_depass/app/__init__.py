"""Applications on top of the library: the `tl-depass` command (`cli`), the explanation it
computes (`explain`, into the plain data of `results`), the HTML page it writes (`html`) and the
plots (`viz`)."""
