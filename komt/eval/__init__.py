"""komt's evaluation: 37 Korean instructions judged 0-5 by an LLM, reported beside komt's published table,
and token-level perplexity.

    questions.py   the 37 questions (packaged in data/, from davidkim205/komt) or a file of your own
    answers.py     answers from komt's generator (model card sampling) or from a JSONL file
    judge.py       the Korean grading prompt, the chat-completions client with retries, the score parser
    results.py     the resumable results file in komt's published format
    run.py         the loop: answer, judge, append; and the progress bar
    report.py      score / average / percentage and the table among the published rows
    perplexity.py  exp(mean NLL) on text or instruction data
    cli.py         `python -m komt.eval`
"""
