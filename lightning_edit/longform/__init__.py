"""Long-form (AnyEdit) editing: requests and loaders (:mod:`.records`), chunking of answers into
target spans from one tokenization (:mod:`.chunking`), long-form metrics (:mod:`.metrics`)."""

from .records import (LONGFORM_FORMATS, LongFormRequest, detect_longform_format, is_longform_record,  # noqa: F401
                      iter_longform_requests, load_longform, longform_records_to_requests)
from .chunking import (ChatTemplateError, ChunkingConfig, Chunks, check_all_fit, check_fits, chunk_answer, end_text_for,  # noqa: F401
                       model_max_positions, prompt_and_answer, render_question, sentence_starts)
from .metrics import (AnswerContained, CorpusBLEU, ExactReproduction, LongFormMetrics, RougeScores,  # noqa: F401
                      SentenceBLEU, TeacherForcedAccuracy, normalize_text, token_correct)
