"""Long-form (AnyEdit) editing: requests and loaders (:mod:`.records`), chunking of answers into
target spans from one tokenization (:mod:`.chunking`), long-form metrics (:mod:`.metrics`)."""

from lightning_edit.longform.chunking import (  # noqa: F401
                      ChatTemplateError,
                      ChunkingConfig,
                      Chunks,
                      check_all_fit,
                      check_fits,
                      chunk_answer,
                      end_text_for,
                      model_max_positions,
                      prompt_and_answer,
                      render_question,
                      sentence_starts,
)
from lightning_edit.longform.metrics import (  # noqa: F401
                      AnswerContained,
                      CorpusBLEU,
                      ExactReproduction,
                      LongFormMetrics,
                      RougeScores,
                      SentenceBLEU,
                      TeacherForcedAccuracy,
                      normalize_text,
                      token_correct,
)
from lightning_edit.longform.records import (  # noqa: F401
                      LONGFORM_FORMATS,
                      LongFormRequest,
                      detect_longform_format,
                      is_longform_record,
                      iter_longform_requests,
                      load_longform,
                      longform_records_to_requests,
)
