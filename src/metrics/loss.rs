//! `loss`: per-token cross-entropy of the unmodified model. (Being written.)
#[derive(Default)]
pub struct Loss;
impl super::Metric for Loss {
    fn name(&self) -> &str {
        "loss"
    }
    fn hooks(&self, _: &super::RunContext) -> Vec<String> {
        todo!()
    }
    fn start_dataset(
        &mut self,
        _: &super::RunContext,
        _: &crate::data::Dataset,
    ) -> crate::Result<()> {
        todo!()
    }
    fn batch(&mut self, _: &super::RunContext, _: &super::BatchView) -> crate::Result<()> {
        todo!()
    }
    fn finish_dataset(
        &mut self,
        _: &super::RunContext,
        _: &crate::data::Dataset,
    ) -> crate::Result<Vec<crate::output::Table>> {
        todo!()
    }
}
