"""sptok: source-prompt tokenization of multi-source corpora.

Words used throughout (easy to confuse, so defined once):
  document  one record of the input (a JSON line, a Parquet row, a text file).
  sample    one packed sequence of ``seq_len`` token ids in the output; holds parts of one or more documents.
  unit      the smallest independent piece of input work: a file, a byte range of a JSONL file, or a group
            of Parquet row groups. Units are planned once and never depend on the number of workers.
  SP        source-prompt token (``<PYDOCS>``), one per source.
"""

__version__ = "0.1.0"
